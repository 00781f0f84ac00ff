"""Text the small built-in tokenizer is trained on (see tools.bpe.build_bpe_tokenizer)."""

# Training text for the tokenizer, original to this project. Paragraphs (split on blank lines) are the
# training documents. The mix of prose, dialogue, numbers, code, and non-English scripts gives merges
# for common English words while leaving accented Latin, CJK, and emoji partly at the byte level.
TOKENIZER_CORPUS = """\
The morning train to the coast was late again, so Mara bought a coffee and sat on the bench near the ticket office. A pigeon walked in slow circles around her shoes, hoping for crumbs. When the train finally arrived, the conductor apologized twice and blamed a fallen tree somewhere north of the river.

Bread needs only four things: flour, water, salt, and time. Mix the flour and water until no dry patches remain, then let the dough rest for thirty minutes before adding the salt. Fold it every half hour for the first two hours. The next day, shape the loaf, bake it in a very hot oven, and wait until it has cooled before you cut it.

"Are you coming to the meeting tomorrow?" asked Daniel.
"I think so, but I might be a few minutes late," said Priya. "My bus doesn't leave until eight fifteen."
"That's fine. We won't start without you."

Stars are born inside huge clouds of gas and dust. Gravity pulls the material together until the core becomes hot and dense enough for hydrogen to fuse into helium. The energy released by fusion pushes outward, balancing the inward pull of gravity, and the star shines steadily for millions or even billions of years.

In 1969, two astronauts walked on the Moon while a third orbited above them. The mission lasted eight days, traveled about 953,000 miles in total, and returned 21.5 kilograms of rock and soil. Today the samples are still studied by scientists around the world.

A good function does one thing, has a clear name, and is short enough to read without scrolling. If you need a comment to explain what a block of code does, consider moving that block into its own function whose name says the same thing. Comments are better used to explain why the code is the way it is.

def fibonacci(n: int) -> list[int]:
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

{"name": "widget", "price": 19.99, "tags": ["blue", "small"], "in_stock": true, "count": 42}

SELECT customer_id, COUNT(*) AS orders FROM sales WHERE year = 2023 GROUP BY customer_id ORDER BY orders DESC LIMIT 10;

The old lighthouse keeper kept a notebook of every ship that passed. Some nights there were none; other nights there were so many that his pencil wore down to a stub. He wrote the name, the direction, the weather, and sometimes a small drawing of the flag. After forty years the notebooks filled an entire shelf.

Rivers shape the land they flow through. Over thousands of years, water carves valleys, carries sand and stones downstream, and builds wide deltas where it meets the sea. Floods can be destructive, but they also spread rich soil across the plains, which is why so many early farming communities settled near rivers.

Please remember to water the plants on Monday and Thursday, feed the cat twice a day, and take the recycling out on Wednesday night. The spare key is under the blue flowerpot. Thank you so much for looking after the house while we are away!

Question: What is the capital of France?
Answer: The capital of France is Paris.
Question: How many legs does a spider have?
Answer: A spider has eight legs.
Question: Which planet is closest to the Sun?
Answer: Mercury is the closest planet to the Sun.

Learning a musical instrument takes patience. At first your fingers feel clumsy and every note sounds wrong, but with daily practice the movements become automatic. Teachers often say that fifteen minutes every day is worth more than two hours once a week, because the brain needs sleep to turn practice into skill.

The committee reviewed three proposals. The first was cheap but slow, the second was fast but expensive, and the third tried to balance both. After a long discussion, they chose the third option, with the condition that the team report its progress every two weeks.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 64 75 99 100 128 256 512 1000 1024 2048 4096 10000 65536 1000000. Dates: 2024-01-15, 12/31/1999, March 3rd, the 21st century. Prices: $4.50, €12, £7.25, ¥300. Percentages: 5%, 37.5%, 100%.

Once upon a time, in a village at the edge of a dark forest, there lived a girl who could speak to foxes. Every evening she left a bowl of water by the gate, and every evening a red fox came to drink and tell her what it had seen in the woods that day: a lost boot, a broken kite, a deer with silver antlers.

Climate describes the average weather of a place over many years, while weather is what happens on a single day. A desert may have a rainy afternoon, and a rainforest may have a dry week, but their climates remain very different. Scientists measure temperature, rainfall, wind, and humidity to understand these long-term patterns.

To reset your password, open the settings page, choose "Account", and click "Forgot password". We will send a link to your email address. The link expires after 24 hours. If you do not receive the message, check your spam folder or contact support.

Le petit café au coin de la rue ouvre à sept heures. On y sert un croissant chaud, un café crème et parfois une tarte aux pommes. Les habitués lisent le journal pendant que le patron discute de la météo avec tout le monde. Ça sent bon le pain frais, et l'été, la terrasse est pleine jusqu'à très tard.

Die Straßenbahn fährt alle zehn Minuten über die Brücke. Im Winter ist es draußen kalt, aber drinnen ist es warm und gemütlich. Viele Menschen lesen Bücher, hören Musik oder schauen aus dem Fenster auf den Fluss. Größere Städte haben oft auch eine U-Bahn, die schneller und pünktlicher ist.

El mercado del sábado está lleno de colores: tomates rojos, limones amarillos, pimientos verdes y flores de todo tipo. Los vendedores gritan los precios y los niños corren entre los puestos. ¿Quién no ha comprado alguna vez más fruta de la que necesitaba? Mañana volveremos, si no llueve.

A canção começou devagar, quase um sussurro, e depois encheu a sala inteira. Ninguém sabia a letra, mas todos cantaram o refrão juntos. Não é preciso entender cada palavra para sentir a emoção de uma música bonita.

Hôm nay trời đẹp quá, chúng tôi đi dạo quanh hồ và ăn phở ở một quán nhỏ gần chợ. Người Việt Nam thường uống cà phê sữa đá vào buổi sáng.

Η θάλασσα ήταν ήρεμη και ο ουρανός καθαρός. Τα παιδιά έπαιζαν στην άμμο ενώ οι γονείς τους διάβαζαν κάτω από μια μεγάλη ομπρέλα.

Вечером мы пили чай на кухне и говорили о книгах. За окном шёл снег, и город становился тихим и белым. Завтра будет холодно, поэтому надо взять тёплый шарф.

今天天气很好，我们去公园散步。湖边有很多人在钓鱼，孩子们在草地上放风筝。晚上我们一起吃饭，聊了很久。学习中文需要时间和耐心，但是很有意思。

東京の朝はとても忙しいです。駅には人がたくさんいて、電車は時間どおりに来ます。私は毎朝コーヒーを飲んでから、会社まで歩いて行きます。週末は友達と一緒に映画を見に行きました。

서울의 가을은 정말 아름답습니다. 나뭇잎이 빨갛고 노랗게 물들고, 사람들은 공원에서 산책을 합니다. 오늘 저녁에는 친구와 함께 김치찌개를 먹을 거예요.

नमस्ते, आप कैसे हैं? आज मौसम बहुत अच्छा है और हम बाज़ार जा रहे हैं।

مرحبا بكم في المدينة القديمة، حيث الشوارع ضيقة والأسواق مليئة بالتوابل والعطور.

Emoji in messages: great job 🎉🎉, see you soon 👋, I love this 😍, coffee time ☕, it's raining 🌧️, birthday cake 🎂, thumbs up 👍🏽, family 👨‍👩‍👧, flags 🇯🇵 🇫🇷 🇧🇷, hearts ❤️💙💚, rocket 🚀 to the moon 🌕.

Math and symbols: α + β = γ, ∑ x² ≤ ∞, √2 ≈ 1.414, π ≈ 3.14159, ∀ε > 0 ∃δ > 0, 90° angle, A → B ⇒ C, ½ + ¼ = ¾, © 2024 ™ ® … « quotes » “curly” ‘single’ — dash – en dash.

The library was quiet except for the soft sound of pages turning. Near the window, an old man was reading a thick book about the history of sailing ships, and at the next table two students whispered about their exam. The librarian pushed a cart of returned books slowly between the shelves, stopping now and then to put one back in its place.

Healthy habits are built slowly. Walk a little every day, drink enough water, eat vegetables with most meals, and try to go to bed at the same time each night. Small changes are easier to keep than big ones, and over months they add up to a real difference in how you feel.

The engineer opened the panel, checked the wiring, and found a loose connection behind the main switch. She tightened the screw, closed the panel, and turned the power back on. The machine hummed, the lights blinked green, and the production line started moving again.

User: Can you help me write a short poem about autumn?
Assistant: Of course! Here is one:
Golden leaves drift through the air,
Cool winds whisper everywhere,
Apples ripen, days grow short,
Autumn paints with every sort.

User: Summarize the plot of a typical detective story in two sentences.
Assistant: A detective is called to investigate a puzzling crime and follows a trail of clues, interviewing suspects who each have something to hide. In the end, the detective reveals the surprising culprit by explaining how the small details fit together.

Markets rise and fall for many reasons: interest rates, company earnings, news from other countries, and sometimes simple fear or excitement. Investors who panic during a downturn often sell at the worst moment, while those who keep a steady plan usually do better over the long run.

The recipe for the soup was written on a yellow card in her grandmother's handwriting: two onions, three carrots, a handful of lentils, one bay leaf, salt, pepper, and "enough love". Nobody ever knew exactly how much that last ingredient was, but the soup always tasted right.

Mountains create their own weather. Air rising over a ridge cools, and its moisture condenses into clouds and rain on the windward side. By the time the air descends on the other side it is dry, which is why deserts are often found in the shadow of great mountain ranges.

Error: file not found (code 404). Warning: disk usage is above 90 percent. Info: server started on port 8080 at 10:42:07. Debug: received 3 requests in 0.25 seconds.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.

Children learn language by listening long before they speak. A baby hears thousands of words every day and slowly discovers which sounds belong together. By the age of two, many children can say dozens of words, and by five they tell long stories full of questions, jokes, and invented words.

Our team will release the new version next week. It includes faster search, a simpler settings menu, and several bug fixes reported by users. We would like to thank everyone who sent feedback during the testing period; your comments helped us decide what to improve first.

Volcanoes form where molten rock from deep underground finds a way to the surface. Some erupt violently, throwing ash kilometers into the sky; others release slow rivers of glowing lava that creep across the landscape. Geologists watch for small earthquakes, swelling ground, and changes in gas emissions to predict when an eruption might begin.

The carpenter measured the board three times before cutting it. "Wood is forgiving," he liked to say, "but a saw is not." His workshop smelled of pine and varnish, and every tool hung on the wall in an outline painted exactly its shape, so anyone could see at a glance what was missing.

Honeybees communicate through a dance. A worker returning from a rich patch of flowers walks in a figure-eight pattern, waggling her body during the straight part. The angle of that run tells the other bees the direction of the food relative to the sun, and its duration tells them the distance.

Dear Ms. Okafor, thank you for your application for the position of junior designer. We were impressed by your portfolio and would like to invite you to an interview on Tuesday, 14 May, at 2:30 pm. Please bring examples of recent projects and let us know if you require any accommodation. Kind regards, the hiring team.

class Stack:
    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty stack")
        return self._items.pop()

const total = items.reduce((sum, item) => sum + item.price * item.quantity, 0);
console.log(`Total: ${total.toFixed(2)}`);

<html><head><title>Example</title></head><body><p class="note">Hello, world!</p></body></html>

fn main() { let words = vec!["alpha", "beta", "gamma"]; for w in &words { println!("{}", w.len()); } }

Photosynthesis turns sunlight, water, and carbon dioxide into sugar and oxygen. It happens inside tiny structures called chloroplasts, which contain the green pigment chlorophyll. Almost every living thing on land depends, directly or indirectly, on the energy captured this way.

The football match ended in a draw after a dramatic final minute. The home side scored first with a brilliant header, but the visitors equalized from a penalty in stopping time. Supporters argued about the referee's decision all the way home, and the newspapers printed the photograph the next morning.

Ancient sailors navigated by the stars, the sun, and the shapes of coastlines. They noticed how swells bent around islands, which birds flew out to sea in the morning and returned at dusk, and how the color of the water changed near shallow reefs. Much of this knowledge was passed on through songs and stories rather than written charts.

Keyboard shortcuts save time: copy with Ctrl+C, paste with Ctrl+V, undo with Ctrl+Z, and search with Ctrl+F. On a Mac, use the Command key instead. Learning even five shortcuts can make everyday work noticeably faster.

A balanced argument considers the strongest version of the opposing view. It is easy to defeat a weak objection, but convincing a thoughtful reader requires admitting uncertainty, presenting evidence fairly, and explaining why your conclusion still holds despite the difficulties.

Winter evenings in the north are long and dark. People light candles, bake cinnamon buns, and invite neighbors for warm drinks. There is even a special word for this feeling of comfort and togetherness, though it is hard to translate exactly into other languages.

Transportation schedule: Route 7 departs at 06:10, 06:40, 07:05, 07:30, and every fifteen minutes until 19:00. Route 12 runs hourly on weekends. Tickets cost 2.80 for adults, 1.40 for children, and are free for passengers over 65.

Le vent soufflait fort sur la côte bretonne, et les vagues frappaient les rochers avec un bruit énorme. Après la tempête, nous avons marché sur la plage pour ramasser des coquillages et regarder les bateaux rentrer au port. Où est passé l'été ? Déjà l'automne frappe à la porte.

Über den Wolken scheint immer die Sonne, sagte meine Großmutter, wenn es draußen regnete. Wir tranken heißen Kakao, spielten Karten und hörten dem Regen zu, der gegen die Fensterscheiben trommelte. Schön war es trotzdem.

En la montaña, el aire es frío y limpio. Subimos despacio por el sendero, parando a menudo para beber agua y mirar el paisaje. Al llegar a la cima, vimos el valle entero, con sus pueblos blancos y campos dorados. ¡Qué vista tan increíble!

Questo piccolo paese italiano è famoso per il suo gelato e per la piazza antica. La sera tutti escono a passeggiare, salutano gli amici e si fermano a bere un caffè. È un posto tranquillo, perfetto per riposarsi.

Şehrin eski sokaklarında yürürken çay kokusu ve simit satıcılarının sesleri her yerdeydi. Güneş batarken boğazın üzerindeki köprü ışıl ışıl parlıyordu.

春天来了，花都开了。小鸟在树上唱歌，农民在田里忙着种地。我喜欢在周末去图书馆看书，有时候也和朋友一起去爬山。北京、上海、广州都是很大的城市。

桜の花が咲くと、多くの人が公園でお花見をします。お弁当を食べたり、写真を撮ったり、友達と話したりして、楽しい時間を過ごします。ありがとうございます。よろしくお願いします。

Quick reactions: 😂 that's hilarious, 🤔 let me think, 🙏 thanks a lot, 🔥 this is amazing, ✅ done, ❌ failed, ⚠️ careful, 💡 idea, 📦 package shipped, 🐍 python, 🦀 rust, 🌍🌎🌏 around the world.
"""
